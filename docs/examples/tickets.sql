-- MySQL dump 10.13
CREATE TABLE `tickets` (`id` int NOT NULL, `question` text, `answer` text, PRIMARY KEY (`id`));
INSERT INTO `tickets` VALUES (1,'How long does a starter take to become active ?','Usually five to ten days of daily feeding.'),
(2,'What temperature should the dough proof at?','Between 24 and 27 degrees Celsius is ideal.'),
(3,'Should I refrigerate my starter?','Yes, between bakes: feed it once a week and warm it up a day before.');
